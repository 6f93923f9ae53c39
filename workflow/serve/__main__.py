"""Operators' command line for the gateway.

    python -m workflow.serve start --package results/package/model.ftpkg [--config config/config.yaml] [--port 8443]
    python -m workflow.serve start --model-dir /model          # a package opened by `python -m workflow.package open`
    python -m workflow.serve keys add --id alice --role analyst      # prints the new key once; only its hash is kept
    python -m workflow.serve keys add --id bob --role analyst --expires-days 90
    python -m workflow.serve keys revoke --id alice                  # a running gateway refuses it at once
    python -m workflow.serve keys list
    python -m workflow.serve audit verify [--log audit/gateway.jsonl] [--expect-head HEX]
    python -m workflow.serve audit prune  [--log audit/gateway.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflow.config import ConfigError, load
from workflow.package.kms import KmsError
from workflow.serve.access import KeyStore
from workflow.serve.audit import AuditBusy, AuditTampered
from workflow.serve.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml", help="the workflow config (rollout.gateway, package)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="serve a package (or forward to rollout.gateway.upstream)")
    start.add_argument("--package", help="the .ftpkg folder to open and serve in-process")
    start.add_argument("--model-dir", help="an engine folder already opened from a package (memory-backed)")
    start.add_argument("--host")
    start.add_argument("--port", type=int)
    start.add_argument("--audit-log", help="overrides rollout.gateway.audit.path")
    keys = commands.add_parser("keys", help="manage API keys")
    keys.add_argument("action", choices=["add", "revoke", "list"])
    keys.add_argument("--id")
    keys.add_argument("--role")
    keys.add_argument("--expires-days", type=float, help="keys add: the key stops working this many days from now")
    audit = commands.add_parser("audit", help="verify or prune the audit log")
    audit.add_argument("action", choices=["verify", "prune"])
    audit.add_argument("--log", help="overrides rollout.gateway.audit.path")
    audit.add_argument("--expect-head", help="the head hash recorded elsewhere (detects truncated tails)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args.config)
        gateway = config.rollout.gateway
        if args.command == "start":
            from workflow.serve.server import serve

            if not (args.package or args.model_dir or gateway.upstream):
                parser.error("start needs --package or --model-dir, or rollout.gateway.upstream in the config")
            serve(config, args.package, args.model_dir, args.host, args.port, args.audit_log)
        elif args.command == "keys":
            store = KeyStore(gateway.api_keys)
            if args.action == "add":
                if not args.id or not args.role:
                    parser.error("keys add needs --id and --role")
                print(store.add(args.id, args.role, args.expires_days))
            elif args.action == "revoke":
                store.revoke(args.id)
                print(f"revoked {args.id}")
            else:
                for entry in store.entries:
                    print(f"{entry['id']}\t{entry['role']}\t{entry['created']}\t{entry.get('expires', 'never')}")
        else:
            log = GatewaySettings.from_config(config, args.log).audit_log(writer=args.action == "prune")
            if args.action == "verify":
                result = log.verify(args.expect_head)
                print(f"audit log verified: {result['records']} records from #{result['first_seq']}, head {result['head']}")
            else:
                print(f"pruned {log.prune()} records older than {gateway.audit.retention_days} days")
    except (ConfigError, ValueError, AuditTampered, AuditBusy, OSError, KmsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
