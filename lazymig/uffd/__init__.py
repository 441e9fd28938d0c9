"""Restore side: userfaultfd and the asyncio lazy-pages daemon."""
