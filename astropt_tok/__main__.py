from astropt_tok.cli import main

main()
