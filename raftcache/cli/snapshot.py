"""`snapshot save` (a consistent backup of the whole cache, from the leader) and `snapshot
restore` (seed the data directories of a new cluster with one).

Contract: both show their progress (`progress.progress_display`) and print one summary line;
a backup that is refused or unreadable exits EXIT_ERROR as `raftcache: BackupError: ...`.
"""

from __future__ import annotations

import os

from raftcache.cli.cluster_calls import client_command, connect, fail, run_client
from raftcache.cli.progress import progress_display


def add_snapshot_commands(sub) -> None:
    snap = sub.add_parser("snapshot", help="backups: save the cluster's state to a file, "
                                           "restore one into a new cluster")
    snap_sub = snap.add_subparsers(required=True, metavar="ACTION")
    client_command(snap_sub, "save", "snapshot", _cmd_snapshot_save, "file",
                   help="write a consistent snapshot of the whole cache, taken by the leader "
                        "at a committed index (everything acknowledged before it), with a "
                        "checksum, to FILE (needs an admin token when auth is on)")
    r = snap_sub.add_parser("restore", help="seed the data directories of a new cluster with "
                                            "a backup; then raftcache up --data-dir DIR "
                                            "--nodes N serves it")
    r.add_argument("file")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--nodes", type=int, default=3)
    r.add_argument("--keyring", help="the old cluster's keyring (values stay encrypted with "
                                     "its keys): checked to open them, then copied to "
                                     "DATA_DIR/keyring (mode 0600)")
    r.add_argument("--without-keyring", action="store_true",
                   help="restore a backup whose values look sealed without a keyring anyway "
                        "(by default refused: they would answer Unavailable)")
    r.add_argument("--storage", default="file-wal", help="the storage the new nodes run")
    r.set_defaults(func=_cmd_snapshot_restore)


def _cmd_snapshot_save(args):
    from raftcache import backup

    def go():
        show, end = progress_display(f"saving {args.file}")
        try:
            with connect(args) as c:
                header = backup.save(c, args.file, show)
        except backup.BackupError as exc:
            return fail("BackupError", str(exc))
        finally:
            end()
        print(f"saved {args.file}: index {header['index']}, term {header['term']}, "
              f"{header['size']:,} bytes, sha256 {header['sha256']}")
        return 0
    return run_client(go)


def _cmd_snapshot_restore(args):
    from raftcache import backup

    show, end = progress_display("nodes seeded")
    try:
        header = backup.restore(args.file, args.data_dir, args.nodes, keyring=args.keyring,
                                storage=args.storage, on_progress=show,
                                without_keyring=args.without_keyring)
    except (backup.BackupError, OSError) as exc:
        return fail("BackupError", str(exc))
    finally:
        end()
    print(f"restored index {header['index']} (term {header['term']}, taken {header['taken']}) "
          f"into {args.nodes} nodes under {args.data_dir}; start them with: raftcache up "
          f"--data-dir {args.data_dir} --nodes {args.nodes}")
    if not args.keyring and args.without_keyring:
        print("values that look sealed at rest need the old cluster's keyring: copy it to "
              f"{os.path.join(args.data_dir, 'keyring')} before `up` if they are")
    return 0
