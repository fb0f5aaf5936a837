"""One thin module per CLI command: NAME, HELP, ``add_arguments(parser)`` (the options) and ``run(args)`` (a
call to the library engine of its stage).

The modules import the library inside ``add_arguments`` and ``run``, not at their top: `sendvae --help`
and ``sendvae CMD --help`` load no torch, and a command loads only its own engine. This is the one place
where the package imports inside functions by design (tests/test_import_graph.py counts those edges too).
"""
