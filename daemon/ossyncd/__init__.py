"""ossyncd: a drop-folder uploader daemon for Alibaba Cloud OSS."""

__version__ = "0.1.0"
