"""The `lmms-msd` command line (`cli`) and its subcommands, one module each.
"""
