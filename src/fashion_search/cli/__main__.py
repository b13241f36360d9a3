"""`python -m fashion_search.cli ...`: the same as the `fashion-search` console script."""

from fashion_search.cli import run

if __name__ == "__main__":
    run()
