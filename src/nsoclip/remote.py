"""--remote-sync: a copy of the run folder on any fsspec file system (s3://, gs://, file://, ...),
and the newest checkpoint there for `--resume latest` when the local folder has none (or an
older one).

OpenCLIP runs `aws s3 sync` (or an fsspec mapper) in a separate process every
--remote-sync-frequency seconds. Here a thread of rank 0 does it through fsspec, for both
protocols: a file goes up when its size or modification time changed since its last upload,
under a temporary name first and then moved into place, so a reader of the remote folder never
sees half a checkpoint. After the checkpoints, `checkpoints/latest.json` names the newest one
(by training step), which is how `--resume latest` finds it without downloading them all.
Checkpoints this process uploaded and then removed locally (older step checkpoints, and those
--delete-previous-checkpoint removes) are removed remotely too; nothing else is ever deleted."""
import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import fsspec

from .checkpoint import checkpoint_position, latest_checkpoint
from .cli import one_line
from .distributed import barrier, broadcast_object
from .errors import NsoclipError

PROTOCOLS = ("s3", "fsspec")
LATEST = "latest.json"


class RemoteSyncError(NsoclipError, RuntimeError):
    """The --remote-sync target cannot be reached or written."""


def filesystem(url: str, protocol: str):
    """(fsspec file system, path inside it) of a --remote-sync URL."""
    if protocol == "s3" and not url.startswith("s3://"):
        raise RemoteSyncError(f"--remote-sync {url}: --remote-sync-protocol s3 needs an s3:// URL "
                              "(--remote-sync-protocol fsspec takes any fsspec URL)")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown protocol, or its package (s3fs, gcsfs) missing
        raise RemoteSyncError(f"--remote-sync {url}: {error}") from None


def is_partial(path: Path) -> bool:
    """Temporary files of our atomic writes (checkpoint.save_checkpoint): never synced."""
    return ".tmp-" in path.name


class RemoteSync:
    """Copies `local_dir` to `{url}/{name}` now (`sync`), every `frequency` seconds in a thread
    (`start`), and once more on `close`."""

    def __init__(self, local_dir: Path, url: str, name: str, protocol: str, frequency: float):
        self.local = Path(local_dir)
        self.url = f"{url.rstrip('/')}/{name}"
        self.fs, self.root = filesystem(self.url, protocol)
        self.frequency = frequency
        self.uploaded = {}  # relative path -> (size, mtime_ns) of its last upload
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None

    def remote(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def first_sync(self) -> None:
        """Sync now, treating remote files of the local file's size as already there (a resumed
        run does not upload its checkpoints again); any failure stops the run before it trains."""
        try:
            remote_sizes = {os.path.relpath(path, self.root): info.get("size")
                            for path, info in self.fs.find(self.root, detail=True).items()}
            for path in self.local_files():
                relative = path.relative_to(self.local).as_posix()
                stat = path.stat()
                if remote_sizes.get(relative) == stat.st_size:
                    self.uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
            self.sync()
        except Exception as error:  # whatever the file system's library raises, the target is unusable
            raise RemoteSyncError(f"--remote-sync {self.url}: cannot sync there "
                                  f"({type(error).__name__}: {one_line(error)})") from None
        logging.info("Remote sync to %s every %g s", self.url, self.frequency)

    def local_files(self):
        return sorted(path for path in self.local.rglob("*") if path.is_file() and not is_partial(path))

    def sync(self) -> None:
        with self.lock:
            checkpoints_changed = False
            for path in self.local_files():
                relative = path.relative_to(self.local).as_posix()
                try:
                    stat = path.stat()
                except FileNotFoundError:  # removed since listed (an older step checkpoint)
                    continue
                if self.uploaded.get(relative) == (stat.st_size, stat.st_mtime_ns):
                    continue
                if self.upload(path, relative):
                    self.uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
                    checkpoints_changed |= relative.startswith("checkpoints/")
            for relative in [r for r in self.uploaded if r.startswith("checkpoints/")]:
                if not (self.local / relative).exists():
                    self.fs.rm(self.remote(relative))
                    del self.uploaded[relative]
                    checkpoints_changed = True
            if checkpoints_changed:
                self.write_latest()

    def upload(self, path: Path, relative: str) -> bool:
        target = self.remote(relative)
        partial = f"{target}.tmp-{os.getpid()}"
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            self.fs.put_file(str(path), partial)
        except FileNotFoundError:
            return False
        self.fs.mv(partial, target)
        return True

    def write_latest(self) -> None:
        newest = latest_checkpoint(self.local / "checkpoints")
        if newest is None or newest.relative_to(self.local).as_posix() not in self.uploaded:
            return
        record = {"checkpoint": newest.name, "step": checkpoint_position(newest)}
        target = self.remote(f"checkpoints/{LATEST}")
        with self.fs.open(f"{target}.tmp-{os.getpid()}", "w") as handle:
            json.dump(record, handle)
        self.fs.mv(f"{target}.tmp-{os.getpid()}", target)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="nsoclip-remote-sync", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.wait(self.frequency):
            try:
                self.sync()
            except Exception as error:  # a transient remote failure must not kill training
                logging.warning("Remote sync to %s failed, retrying in %g s: %s", self.url, self.frequency, error)

    def close(self) -> None:
        """The final sync (also after a stop on a signal or an error), so the remote copy holds
        the last checkpoint; a failure here is logged, the local run folder is complete anyway."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        logging.info("Final remote sync to %s", self.url)
        try:
            self.sync()
        except Exception as error:
            logging.error("Final remote sync to %s failed: %s (the local run folder %s is complete)",
                          self.url, error, self.local)


def fetch_latest(url: str, name: str, protocol: str, checkpoint_dir: Path, world,
                 local_step: Optional[int] = None) -> Optional[Path]:
    """The newest remote checkpoint of the run, downloaded into `checkpoint_dir`, when it is newer
    than the local one at `local_step` (None: there is none); None otherwise. Rank 0 reads
    latest.json, the local rank 0 of every node downloads (through a temporary file), all wait."""
    choice = None
    if world.is_master:
        fs, root = filesystem(f"{url.rstrip('/')}/{name}", protocol)
        latest = f"{root.rstrip('/')}/checkpoints/{LATEST}"
        if fs.exists(latest):
            with fs.open(latest, "r") as handle:
                record = json.load(handle)
            if local_step is None or int(record["step"]) > local_step:
                choice = record["checkpoint"]
    choice = broadcast_object(choice)
    if choice is None:
        return None
    target = Path(checkpoint_dir) / choice
    if world.local_rank == 0 and not target.exists():
        fs, root = filesystem(f"{url.rstrip('/')}/{name}", protocol)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        source = f"{url.rstrip('/')}/{name}/checkpoints/{choice}"
        logging.info("Downloading %s to %s", source, target)
        try:
            fs.get_file(f"{root.rstrip('/')}/checkpoints/{choice}", str(partial))
        except Exception as error:  # whatever the file system's library raises, the copy is unusable
            partial.unlink(missing_ok=True)
            raise RemoteSyncError(f"--remote-sync: cannot download {source}, which {LATEST} names as the newest "
                                  f"checkpoint ({type(error).__name__}: {one_line(error)})") from None
        os.replace(partial, target)
    barrier()
    return target
