"""Shared test helper: run one sub-command through its own parser."""
import argparse


def bench_cli(argv):
    """``fewstep bench ARGV`` through the command's own parser (independent of other commands)."""
    from fewstep.commands import bench

    ap = argparse.ArgumentParser(prog="fewstep")
    bench.add_parser(ap.add_subparsers(dest="command"))
    a = ap.parse_args(["bench", *argv])
    return a.func(a)
