"""Data: generators and readers for DiffMask experiments."""

from dmx.data.toy import ToyData, endless_batches, generate_toy_data, ground_truth_attribution, iterate_batches, split_toy_data
