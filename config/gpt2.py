"""Plain GPT-2 (no memory): the control for Table 1 of the write-up."""
init_from = 'gpt2'
start = "\nCats are horrible"
method_text = "Unadulterated GPT-2"
