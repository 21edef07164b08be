"""`python -m packager`: Ctrl-C is one line and exit 130 at any moment, even while the command line loads."""

try:
    from packager.cli import main
except KeyboardInterrupt:
    import sys

    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
