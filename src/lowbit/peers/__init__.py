"""Other runtimes to compare lowbit with (optional plug-ins: each needs its own package, and
nothing in lowbit's core imports them). :mod:`lowbit.peers.llamacpp`: llama.cpp through
llama-cpp-python, on GGUF files written by :func:`lowbit.gguf.export_gguf`."""
