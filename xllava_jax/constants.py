"""Constants shared by the data pipeline and the models; this module imports nothing of the package."""

# The label of a position that is not a training target (prompts, image tokens, padding): the loss skips it,
# as PyTorch's cross-entropy default `ignore_index` and LLaVA's data code do.
IGNORE_INDEX = -100
