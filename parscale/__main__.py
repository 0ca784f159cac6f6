from parscale.cli import main

main()
