"""`hf-lowrank push` and `hf-lowrank pull`: the command-line faces of `hf_lowrank.hub`."""

from __future__ import annotations

from .format import AdapterError
from .hub import HubError, copy_adapter, pull_adapter, push_adapter


def push_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank push DIR REPO [--private] [--revision BRANCH] [--message M] [--create-pr]`."""
    from .commandline import ArgumentParser, report

    p = ArgumentParser(prog="hf-lowrank push", description="Push an adapter folder (only its adapter files "
                                "and model card) to the Hugging Face Hub in one commit.")
    p.add_argument("folder", help="adapter folder (adapter_model.safetensors + adapter_config.json)")
    p.add_argument("repo_id", help="Hub repo, 'user/name' or 'org/name'; created when missing")
    p.add_argument("--private", action="store_true", help="create the repo private (no effect if it exists)")
    p.add_argument("--revision", help="branch to commit to; created from main when missing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request against main instead")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    p.add_argument("--base-model", help="Hub id of the base model to publish (default: the id recorded when the base "
                   "was loaded; a local path is never published)")
    args = p.parse_args(argv)
    try:
        info = push_adapter(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            commit_message=args.message, token=args.token, create_pr=args.create_pr,
                            base_model=args.base_model)
    except (HubError, AdapterError, ValueError) as e:
        return report("hf-lowrank push", e)
    print(info.pr_url or info.commit_url)
    return 0


def pull_main(argv: list[str] | None = None) -> int:
    """`hf-lowrank pull REPO [--revision R] [--output DIR]`: prints the folder holding the adapter."""
    from .commandline import ArgumentParser, report

    p = ArgumentParser(prog="hf-lowrank pull", description="Download an adapter's files from the Hugging "
                                "Face Hub (into the Hub cache, or a folder with --output).")
    p.add_argument("repo_id", help="Hub repo, 'user/name'")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--output", help="copy the adapter files into this folder (created when missing)")
    p.add_argument("--token", help="Hub token for private repos (default: HF_TOKEN or the saved token)")
    args = p.parse_args(argv)
    try:
        folder = pull_adapter(args.repo_id, revision=args.revision, token=args.token)
        if args.output:
            folder = copy_adapter(folder, args.output)
    except HubError as e:
        return report("hf-lowrank pull", e)
    print(folder)
    return 0
