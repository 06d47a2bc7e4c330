"""`stip audit`: published attacks run against what a real STIP server received, with measured recovery rates.

The auditor plays the attacker (the server, holding the server bundle, what it captured with `stip serve --capture`,
and possibly the public weights the model was fine-tuned from) and scores each attack against the truth it alone
holds (the prompts it sent, the keys). `context.py` holds what attacks see; `attacks/` one module per attack;
`report.py` writes the Markdown/JSON report with plots.
"""
