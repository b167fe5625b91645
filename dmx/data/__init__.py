"""Data: the toy generator and readers for SST-5 and SQuAD v1.1.

Each module has its own ``iterate_batches``; import the module
(``from dmx.data import sst``) rather than the name.
"""

from dmx.data import squad, sst, toy
from dmx.data.common import endless_batches
from dmx.data.toy import ToyData, generate_toy_data, ground_truth_attribution, split_toy_data
