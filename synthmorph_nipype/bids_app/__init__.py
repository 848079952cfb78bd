"""The BIDS App: ``synthmorph-bids bids_dir output_dir {participant,group}``."""
