"""`eve compare`: encoder-free EVE v1 / v2 against an encoder-based baseline at equal training compute."""
