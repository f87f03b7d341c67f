"""The pure core: data in, data out; see README.md in this folder."""
