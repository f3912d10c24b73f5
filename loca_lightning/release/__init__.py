"""The authors' released checkpoints (scenic/projects/loca, flax msgpack) read without JAX: ``loca import-release``."""

from loca_lightning.release.convert import ReleaseArchitecture, infer_architecture, parse_release_tree
from loca_lightning.release.flax_files import ReleaseFormatError, read_flax_msgpack, resolve_checkpoint_file
from loca_lightning.release.importer import import_release, import_release_main, release_module_checkpoint

__all__ = [
    "ReleaseArchitecture",
    "ReleaseFormatError",
    "import_release",
    "import_release_main",
    "infer_architecture",
    "parse_release_tree",
    "read_flax_msgpack",
    "release_module_checkpoint",
    "resolve_checkpoint_file",
]
