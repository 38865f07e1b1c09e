"""Push subscriptions: the queue POSTs batches of messages to HTTP endpoints (webhooks).

A subscription is a consumer like any pull consumer: the dispatcher leases
messages through the same lease, ack and nack rules, so each message goes to
one consumer, and failed deliveries count towards the queue's max_deliveries.
"""
