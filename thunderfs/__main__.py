from thunderfs.cli import main

raise SystemExit(main())
