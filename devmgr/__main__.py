from devmgr._cli import main

raise SystemExit(main())
