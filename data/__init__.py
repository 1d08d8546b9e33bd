"""The corpus files of maml_gpt.py: prepare (tokenizer, token files, SMLMT index) and toyworld."""
