from thunderfs_tracker.cli import main

raise SystemExit(main())
