"""PartDistillation: learning object parts for thousands of classes without part labels.

The pipeline is a chain of stages (see ``part_distillation.stages``), each reading one
stage output from the record store and writing the next.
"""
__version__ = "0.1.0"
