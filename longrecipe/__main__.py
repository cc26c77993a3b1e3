from longrecipe.cli import main

main()
