"""Command-line entry point: python run_search.py --space search_spaces/faerec.yaml"""
