"""What every layer may use: a batch's inputs (a tensor or a dict of tensors), the device
helpers, data-parallel sums across processes, the file names of a run and the one atomic
writer, and the progress bars.

Nothing here imports another module of the package.
"""
