"""The FUSE side of clearmlfs: inode table, namespace, open files, pyfuse3 operations.

Only this package imports trio and pyfuse3, and only `workers.py` crosses into threads.
"""
