"""Queue semantics without I/O: leases, visibility, delivery counts, dead-lettering, dedup.

Nothing in this package reads files, opens sockets or imports the HTTP or storage
layers, so it is unit-tested with plain values and an explicit clock.
"""
