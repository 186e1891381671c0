"""clearmlfs: ClearML-style object storage (S3, MinIO, Azure Blob, GCS) as a local filesystem."""

from .storage_manager import StorageManager

__version__ = "0.1.0"
__all__ = ["StorageManager", "__version__"]
