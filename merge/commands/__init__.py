"""The command line's rooms: one light module per command (argparse only at import); each command imports the
room that does its work when it runs, so ``merge run`` never imports the build's packages."""
