from lit_spine.cli import main

raise SystemExit(main())
