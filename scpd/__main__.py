from scpd.cli import main

raise SystemExit(main())
