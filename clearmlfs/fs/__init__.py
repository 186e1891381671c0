"""The FUSE side of clearmlfs: inode table, namespace, open files, pyfuse3 operations.

Only this package imports trio and pyfuse3; only `workers.py` crosses into threads, and only `fetchers.py`
into the helper processes of `clearmlfs.fetcher`.
"""
