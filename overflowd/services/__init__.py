"""Trio services at the edge: sockets, timers, HTTP and the database live here.

Each service is ``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED)``, reports its
bound address with ``task_status.started(addr)`` and offers ``statistics()``.
"""
