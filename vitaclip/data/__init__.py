"""Video data: list files, frame sampling, decoding (DALI GPU/CPU, PyAV), on-device
transforms and RandAugment, the batch loader, and dataset preparation."""
from .lists import VideoEntry, folder_to_class_name, read_class_names, read_video_list, write_video_list
from .loader import Batch, VideoLoader
from .pyav import VideoDecodeError
from .transforms import CLIP_MEAN, CLIP_STD

__all__ = ["Batch", "CLIP_MEAN", "CLIP_STD", "VideoDecodeError", "VideoEntry", "VideoLoader",
           "folder_to_class_name", "read_class_names", "read_video_list", "write_video_list"]
