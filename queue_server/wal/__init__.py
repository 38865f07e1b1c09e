"""The write-ahead log: framed, checksummed records in segment files."""
