from lipsdp.cli import main

main()
