"""The HTTP adapter: Starlette routes over ``QueueService``."""
