"""The doors: the `captioner` command (cli: its flags; commands: what each command does), batch captioning
of files (batch, with inputs: what it captions, and outputs: its results file) and the web demo (demo).

They parse input, call the library and format output. Nothing in the library imports them.
"""
