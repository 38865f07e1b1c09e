"""Telemetry streamer: publishes the rows of a DCGM exporter CSV dump to the queue, pass after pass.

Each pass simulates one scrape of every GPU in the file. Every row becomes one
``TelemetryRecord`` on the ``telemetry`` queue, stamped with the time it was
processed and with an idempotency key ``{file}:{run id}:{pass}:{line}`` that is
also the message key. The queue stores a key once within its deduplication
window, so a batch that is sent again, or a shard that a second streamer
publishes again after a crash, is stored once.

Work sharing
------------
Any number of streamers of the same file share the work through a control queue
(``telemetry.shards`` by default; one control queue per CSV file). Nothing
configures their number:

* The file is cut into shards of ``--rows-per-shard`` consecutive records, given
  as byte ranges, so a streamer seeks straight to its shard.
* A shard message on the control queue names one shard for one pass. A streamer
  leases one message at a time with a short visibility timeout (10 s by default)
  and extends the lease every third of it while it works. It publishes the
  shard's rows in batches, then publishes the message for the next pass with a
  delay until that pass is due, and acks the current one. Idle streamers take
  whatever shard is ready, so a streamer that starts gets work within a lease
  poll (1 s), and the others simply find less to do.
* One streamer works on ``--concurrent-shards`` shards at the same time (2 by
  default), each under its own lease, as that many separate streamers would. The
  control-queue requests of one shard then overlap the publishing of another.
* Pass ``k`` is due at ``run_start + k * interval``, a wall-clock schedule carried
  in the shard messages, so every streamer follows the same one. A streamer that
  leases a shard after its due time reports the lag in the log and in the
  ``streamer_schedule_lag_seconds`` gauge, then catches up as fast as the queue
  accepts rows: passes are never skipped.
* On SIGTERM or SIGINT a streamer finishes the batches in flight, nacks its shard
  messages with delay 0 and exits 0. Another streamer republishes the whole shard
  under the same keys. A streamer that crashes loses its lease when the
  visibility timeout runs out, and its shard goes to another streamer the same way.

Runs
----
A run is one schedule of passes over one file, with a run id that is part of
every key. When a streamer starts and the control queue is empty, it
plans the shards and publishes a run message (``kind: "run"``) with a new run
id (UTC start time plus random digits) under the key
``run:{file}:{size}:{n}``. Streamers started together publish under the same
key, so the queue keeps only the first run message. The streamer that leases it publishes
the shard messages of pass 0, keyed by (run id, shard, pass), and acks it.
A later run gets a new run id, so its keys never collide with an earlier run's,
even after the queue's data is wiped. When ``run:{file}:{size}:{n}`` is a
duplicate while the control queue is empty, it belongs to a run that ended
within the deduplication window, and the next ``n`` is tried.

With ``--passes N`` the last pass publishes no follow-up messages. A streamer
exits 0 when a lease poll returns nothing and the control queue holds no ready,
leased or delayed message. A shard that a crashed streamer held is still leased
until its timeout, so the others wait for it and take it over before they exit.
Without ``--passes`` the run never ends, and a streamer without ``--passes`` that
finds the control queue empty creates a new run, even after a run with
``--passes`` has ended.

A stop request during the idle lease poll ends the poll at once, even while the
client is retrying against an unreachable queue. A stop request while a batch is
being published waits for that batch, which the client retries until the queue
accepts it; a second SIGTERM or SIGINT ends the streamer at once.
"""
