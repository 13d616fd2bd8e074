from vmdp.cli.main import main

main()
