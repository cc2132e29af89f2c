"""Security commands: `certs` (mutual TLS certificates), `token` (signed client tokens),
`role` and `auth` (the rbac plugin's roles and revocations), `keys` (encryption at rest).

Contract: the commands that need no cluster (certs, token issue and inspect, keys init) work
on files alone; the others are client commands (`cluster_calls`) that call the security
plugins' admin actions and print their answers (JSON; keys rotate: its progress).
"""

from __future__ import annotations

import os
import sys

from raftcache.cli.cluster_calls import client_command, connect, fail, run_client
from raftcache.cli.progress import ResealProgress


def add_certs_commands(sub) -> None:
    certs = sub.add_parser("certs", help="certificates for mutual TLS")
    certs_sub = certs.add_subparsers(required=True, metavar="ACTION")
    ci = certs_sub.add_parser("init", help="create a CA, node and client certificates")
    ci.add_argument("--dir", required=True)
    ci.add_argument("--nodes", type=int, default=3)
    ci.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="a DNS name (a leftmost '*' covers one label) or IP address that "
                         "node certificates also name, beside localhost and 127.0.0.1-16; "
                         "repeatable. Peers check it against the address they dial, e.g. "
                         "'*.raftcache-peers.NAMESPACE.svc.cluster.local' for "
                         "examples/kubernetes")
    ci.add_argument("--force", action="store_true",
                    help="replace an existing CA (every certificate it signed stops working)")
    ci.set_defaults(func=_cmd_certs_init)
    ca = certs_sub.add_parser("add-node", help="a certificate for one more node (one that "
                                               "joins), signed by the CA in DIR")
    ca.add_argument("--dir", required=True)
    ca.add_argument("--node", type=int, required=True)
    ca.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="as for init")
    ca.set_defaults(func=_cmd_certs_add_node)


def add_keys_commands(sub) -> None:
    keys = sub.add_parser("keys", help="encryption at rest: the keyring and data keys")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    ki = keys_sub.add_parser("init", help="make a keyring file (mode 0600): a random master "
                                          "key; every node of a cluster needs the same file")
    ki.add_argument("file")
    ki.set_defaults(func=_cmd_keys_init)
    client_command(keys_sub, "rotate", "admin", _cmd_keys_rotate,
                   help="add a data key through the log (new values are sealed with it), "
                        "then seal every older value anew with it, printing progress")
    client_command(keys_sub, "status", "admin", _cmd_keys_status,
                   help="print the data keys (active, known) and how many values each seals, "
                        "as JSON")


def _cmd_certs_init(args):
    from raftcache.certs import init_certs

    try:
        paths = init_certs(args.dir, nodes=args.nodes, overwrite=args.force,
                           extra_ips=args.host)
    except FileExistsError as exc:
        print(f"raftcache: {exc} (pass --force to replace the CA)", file=sys.stderr)
        return 2
    print(f"wrote certificates to {args.dir}:")
    for name in sorted(paths):
        print(f"  {name}: {paths[name]}")
    return 0


def _cmd_certs_add_node(args):
    from raftcache.certs import add_node_cert

    try:
        cert, key = add_node_cert(args.dir, args.node, extra_hosts=args.host)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key}")
    return 0


def add_auth_commands(sub) -> None:
    token = sub.add_parser("token", help="issue, inspect and revoke signed client tokens")
    token_sub = token.add_subparsers(required=True, metavar="ACTION")
    ti = token_sub.add_parser("issue", help="print a new token signed with the cluster's key")
    key = ti.add_mutually_exclusive_group(required=True)
    key.add_argument("--data-dir", help="the data dir of `raftcache up --auth` (its "
                                        "auth/signing.key)")
    key.add_argument("--signing-key", help="an Ed25519 private key (PEM, mode 0600)")
    ti.add_argument("--subject", required=True, help="who the token is for")
    ti.add_argument("--grant", action="append", default=[], metavar="PREFIX=PERMS",
                    help="PERMS (r, w, rw or admin) on every key starting with PREFIX (may be "
                         "empty: every key); repeatable")
    ti.add_argument("--role", action="append", default=[], metavar="NAME",
                    help="a role whose grants the cluster holds (`raftcache role set`)")
    ti.add_argument("--ttl", type=float, default=None,
                    help="seconds until it expires (default: 86400, a day); printed on stderr "
                         "with the token's id (jti), which `token revoke --jti` takes")
    ti.set_defaults(func=_cmd_token_issue)
    tin = token_sub.add_parser("inspect", help="print a token's header and claims as JSON, "
                                               "and whether its signature verifies")
    tin.add_argument("token", help="the token (- reads it from stdin)")
    pub = tin.add_mutually_exclusive_group()
    pub.add_argument("--data-dir", help="verify with DATA_DIR/auth/signing.pub")
    pub.add_argument("--public-key", help="verify with this Ed25519 public key (PEM)")
    tin.set_defaults(func=_cmd_token_inspect)
    for name, text in (
            ("revoke", "revoke every token of SUBJECT issued until now, or with --jti one "
                       "token (through the log; needs an admin token)"),
            ("unrevoke", "lift SUBJECT's revocation (its older tokens work again), or with "
                         "--jti that of one token")):
        tr = client_command(token_sub, name, "admin", _cmd_token_revoke, help=text)
        tr.add_argument("subject", nargs="?")
        tr.add_argument("--jti", metavar="ID|TOKEN",
                        help="one token: its id (printed at issue) or the token itself (then "
                             "the revocation is dropped once the token expires)")
        tr.set_defaults(action=name)
    role = sub.add_parser("role", help="named sets of grants that tokens refer to")
    role_sub = role.add_subparsers(required=True, metavar="ACTION")
    rs = client_command(role_sub, "set", "admin", _cmd_auth_admin, "name",
                        help="create or replace a role (through the log)")
    rs.add_argument("--grant", action="append", required=True, metavar="PREFIX=PERMS")
    rs.set_defaults(action="role-set")
    client_command(role_sub, "delete", "admin", _cmd_auth_admin, "name",
                   help="delete a role").set_defaults(action="role-delete")
    auth = sub.add_parser("auth", help="the cluster's access control")
    auth_sub = auth.add_subparsers(required=True, metavar="ACTION")
    client_command(auth_sub, "status", "admin", _cmd_auth_admin,
                   help="print revoked subjects (with when) and roles as JSON"
                   ).set_defaults(action="auth-status")


def _cmd_token_issue(args):
    from raftcache.plugins.security import tokens

    path = args.signing_key or os.path.join(args.data_dir, "auth", "signing.key")
    try:
        grants = dict(tokens.parse_grant(g) for g in args.grant)
        if not grants and not args.role:
            raise ValueError("give at least one --grant PREFIX=PERMS or --role NAME")
        key = tokens.load_private_key(path)
        token = tokens.issue(key, args.subject, grants, roles=args.role,
                             ttl=tokens.USER_TTL if args.ttl is None else args.ttl)
    except (tokens.TokenError, ValueError) as exc:
        return fail("InvalidRequest", str(exc))
    print(token)
    _header, claims = tokens.unverified(token)
    # stderr: stdout holds the token alone, for $(raftcache token issue ...)
    print(f"token for {claims['sub']!r} (jti {claims['jti']}) expires at "
          f"{tokens.expiry_text(claims['exp'])}", file=sys.stderr)
    return 0


def _cmd_token_revoke(args):
    """revoke/unrevoke SUBJECT, or --jti ID|TOKEN: the admin actions revoke, unrevoke,
    revoke-jti (with the token's expiry when a token is given) and unrevoke-jti."""
    import json

    from raftcache.plugins.security import tokens

    if (args.subject is None) == (args.jti is None):
        args.usage_error("give a SUBJECT or --jti ID|TOKEN (one of them)")
    if args.jti is None:
        call = (args.action, args.subject)
    else:
        jti, extra = args.jti, ()
        if jti.count(".") == 2:  # a token: its id, and its expiry to drop it by
            try:
                _header, claims = tokens.unverified(jti)
            except tokens.TokenError as exc:
                return fail("InvalidRequest", str(exc))
            jti = claims.get("jti")
            if not isinstance(jti, str) or not jti:
                return fail("InvalidRequest", "this token has no jti: revoke its subject")
            exp = claims.get("exp")
            if args.action == "revoke" and type(exp) in (int, float) and exp > 0:
                extra = (str(round(exp * 1000)),)  # the expires_ms nodes judge it by
        call = (args.action + "-jti", jti, *extra)

    def go():
        with connect(args) as c:
            print(json.dumps(c.admin(*call), sort_keys=True))
    return run_client(go)


def _cmd_token_inspect(args):
    """Exit 0: printed (verified, or no key given); 1: the signature does not verify with
    the key given; 2: not a token."""
    import json

    from raftcache.plugins.security import tokens

    text = (sys.stdin.read() if args.token == "-" else args.token).strip()
    try:
        header, claims = tokens.unverified(text)
    except tokens.TokenError as exc:
        return fail("InvalidRequest", str(exc))
    out = {"header": header, "claims": claims, "verified": False}
    path = args.public_key or (os.path.join(args.data_dir, "auth", "signing.pub")
                               if args.data_dir else None)
    code = 0
    if path is None:
        out["note"] = "signature not checked (give --data-dir or --public-key)"
    else:
        try:
            caller = tokens.verify(text, tokens.load_public_keys([path]))
            out["verified"] = True
            out["key_id"] = caller.key_id
        except tokens.TokenError as exc:
            out["error"] = str(exc)
            code = 1
    print(json.dumps(out, indent=2, sort_keys=True))
    return code


def _cmd_auth_admin(args):
    import json

    positional = [getattr(args, name) for name in ("subject", "name") if hasattr(args, name)]
    positional += list(getattr(args, "grant", None) or ())

    def go():
        with connect(args) as c:
            print(json.dumps(c.admin(args.action, *positional), sort_keys=True))
    return run_client(go)


def _cmd_keys_init(args):
    from raftcache.plugins.security.encryption import make_keyring

    try:
        keyring = make_keyring(args.file)
    except FileExistsError:
        return fail("InvalidRequest", f"{args.file} exists; a keyring is never replaced (the "
                    "values it sealed could no longer be read)")
    except OSError as exc:
        return fail("InvalidRequest", f"{args.file}: {exc.strerror}")
    print(f"wrote keyring {args.file} (master key {keyring.master_id}, mode 0600); give every "
          "node of the cluster this same file: [encryption] keyring = \"...\"")
    return 0


def _cmd_keys_status(args):
    import json

    def go():
        with connect(args) as c:
            print(json.dumps(c.admin("keys-status"), sort_keys=True))
    return run_client(go)


def _cmd_keys_rotate(args):
    def go():
        with connect(args) as c:
            rotated = c.admin("keys-rotate")
            print(f"data key {rotated['key_id']} is active (was {rotated['previous']}); "
                  "sealing older values anew", flush=True)
            return _reseal_all(c)
    return run_client(go)


def _reseal_all(client, passes: int = 3) -> int:
    """keys-reseal page after page until a pass finds nothing left under an older key (a
    pass can miss values that deletes moved behind it: up to `passes` passes)."""
    import time

    from raftcache import errors

    progress = ResealProgress()
    failing_since = None
    try:
        for _ in range(passes):
            position, resealed = 0, 0
            while True:
                try:
                    answer = client.admin("keys-reseal", str(position))
                    failing_since = None
                except errors.Unavailable:  # a leader change, a backend catching up
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > 30:
                        raise
                    time.sleep(0.2)
                    continue
                resealed += answer.get("result") or 0
                position = answer["next"]
                progress.update(position, answer["keys"], resealed)
                if answer["done"]:
                    break
            status = client.admin("keys-status")
            older = {k: n for k, n in (status.get("values") or {}).items()
                     if (k.isdigit() and int(k) != status["active"])
                     or k.endswith("-unbound")}  # stored before the version binding
            if not older:
                if not status.get("bound") and status.get("values") is not None:
                    # None stored unbound: from now on such a value is refused (an older
                    # copy put back), whatever key it names.
                    client.admin("keys-require-bound")
                progress.close(f"done: no value is sealed under an older data key than "
                               f"{status['active']}")
                return 0
            progress.note(f"{sum(older.values())} values still under older keys "
                          f"({older}): another pass")
    finally:
        progress.close()
    return fail("Unavailable", "values under older data keys remain after "
                               f"{passes} passes; run `raftcache keys rotate` again later")
