from tilestack.cli import main

main()
