"""Where a notebook run keeps what it writes, on Databricks as it is today: a Unity Catalog volume by default.

Databricks' DBFS root and mounts are deprecated, new accounts are provisioned without them, and the DBFS root is
readable by every user of a workspace. So on Databricks:

- the finished model's copy, a multi-node run's folder (checkpoints, which ``--resume`` unpickles, included) and a
  table's copy go to the volume the ``volume`` widget names (``/Volumes/<catalog>/<schema>/<volume>``; empty: the
  ``dolly`` volume of the session's current catalog and schema, created with ``CREATE VOLUME IF NOT EXISTS`` when
  the user may);
- DBFS is used only when the ``dbfs_output_root`` widget names it (and refused where the workspace has none);
- a table's rows are copied only into a volume: a governed table is never copied where every user can read it;
- a one-node run trains on the driver's local disk (``/local_disk0``: fast, and nothing else reads it there; volumes
  take no appends, which TensorBoard's event files need) and copies the finished model to the volume;
- with neither a volume nor DBFS to write to, the run is refused before anything starts, in one line saying what
  to set.

Elsewhere the ``volume`` widget may name any folder every node sees; nothing else changes.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

# Where Unity Catalog volumes appear on a Databricks cluster (a stand-in folder in the tests).
VOLUMES_ROOT = os.environ.get("DOLLY_VOLUMES_ROOT", "/Volumes")
DEFAULT_VOLUME_NAME = "dolly"
TRAINING_DIR_NAME = "dolly_training"
VOLUME_PATH = re.compile(r"^/Volumes/([^/]+)/([^/]+)/([^/]+)/?$")


class StorageError(ValueError):
    """Nowhere the run may write (no volume, no DBFS), or a table that would be copied outside a volume."""


def nowhere_message(why: str) -> str:
    return (
        f"{why}: set the volume widget to a Unity Catalog volume you can write (/Volumes/<catalog>/<schema>/<volume>; "
        "the notebook creates it when you may), or dbfs_output_root to a DBFS folder on a workspace that has DBFS"
    )


def volume_parts(path: str) -> tuple[str, str, str] | None:
    """(catalog, schema, volume) of a volume's root path, as Unity Catalog names it (stand-in roots included)."""
    if path.startswith(VOLUMES_ROOT + "/"):
        path = "/Volumes" + path[len(VOLUMES_ROOT) :]
    match = VOLUME_PATH.match(path)
    return match.groups() if match else None


def default_volume(spark: Any) -> str:
    """The ``dolly`` volume of the session's current catalog and schema."""
    catalog, schema = spark.sql("SELECT current_catalog(), current_database()").first()
    return f"{VOLUMES_ROOT}/{catalog}/{schema}/{DEFAULT_VOLUME_NAME}"


def ensure_volume(spark: Any, path: str) -> bool:
    """Whether the volume at ``path`` is there, after creating it (``CREATE VOLUME IF NOT EXISTS``) when it is not
    and the user may."""
    if os.path.isdir(path):
        return True
    parts = volume_parts(path)
    if parts is None or spark is None:
        return False
    name = ".".join(f"`{part}`" for part in parts)
    try:
        spark.sql(f"CREATE VOLUME IF NOT EXISTS {name}")
    except Exception as err:  # no privilege on the schema, or no Unity Catalog: said by the caller
        logger.warning("Could not create the volume %s: %s", name, str(err).splitlines()[0] if str(err) else err)
        return False
    logger.info("Created the volume %s (%s)", name, path)
    return os.path.isdir(path)


def notebook_volume(spark: Any, widget: str, *, databricks: bool) -> str:
    """The volume a run writes to: the widget's (created if it may be), else on Databricks the default one; "" when
    there is none (the run paths then refuse, unless DBFS was named)."""
    widget = widget.strip().rstrip("/")
    if not databricks:
        return widget
    volume = widget or default_volume(spark)
    if ensure_volume(spark, volume):
        return volume
    if widget:
        raise StorageError(
            nowhere_message(f"the volume widget names {widget}, which does not exist and could not be created")
        )
    return ""


def dbfs_available() -> bool:
    """Whether this workspace has DBFS (its FUSE mount); new accounts do not."""
    return os.path.isdir("/dbfs")


def is_shared(path: str) -> bool:
    """Whether ``path`` is on storage every node sees (a volume, or DBFS)."""
    return path.startswith(("/dbfs/", "/Volumes/", VOLUMES_ROOT + "/"))


def databricks_roots(
    *, local_training_root: str, dbfs_output_root: str, volume: str, num_nodes: int
) -> tuple[str, str]:
    """On Databricks: the training root and the root of the finished model's copy ("" for none), as the module's
    docstring says; :class:`StorageError` when there is nowhere to write."""
    if dbfs_output_root and dbfs_output_root.startswith("/dbfs") and not dbfs_available():
        raise StorageError(
            nowhere_message(f"dbfs_output_root names {dbfs_output_root}, but this workspace has no DBFS")
        )
    shared = os.path.join(volume, TRAINING_DIR_NAME) if volume else dbfs_output_root
    if not local_training_root:
        if num_nodes > 1:
            if not shared:
                raise StorageError(nowhere_message(f"num_nodes {num_nodes} needs storage every node sees"))
            local_training_root = os.path.join(shared, "runs")
        elif os.path.exists("/local_disk0"):
            local_training_root = os.path.join("/local_disk0", TRAINING_DIR_NAME)
        else:
            local_training_root = os.path.join(os.path.expanduser("~"), TRAINING_DIR_NAME)
    if is_shared(local_training_root):
        return local_training_root, dbfs_output_root if dbfs_output_root else ""
    copy_root = dbfs_output_root or shared
    if not copy_root:
        raise StorageError(nowhere_message(f"the run trains in {local_training_root}, which ends with the cluster"))
    return local_training_root, copy_root


def table_copy_dir(volume: str, *, databricks: bool, fallback: str) -> str:
    """Where a table's rows are copied for training: on Databricks, the volume's (refused without one: never the
    DBFS root, which every user can read); elsewhere ``fallback`` (beside the runs), or the volume when named."""
    if volume:
        return os.path.join(volume, TRAINING_DIR_NAME, "prepared_data")
    if databricks:
        raise StorageError(
            "a Unity Catalog table's rows are copied for training only into a volume: set the volume widget to "
            "/Volumes/<catalog>/<schema>/<volume> (DBFS root, which every workspace user can read, is never used "
            "for them)"
        )
    return fallback
