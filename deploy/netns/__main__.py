"""`python -m deploy.netns ...`: the CLI of deploy/netns/cli.py."""

from deploy.netns.cli import main

main()
