from lib_copier.cli import main

raise SystemExit(main())
