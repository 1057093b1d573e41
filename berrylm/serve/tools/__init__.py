"""Tools at serving time: the calculator sandbox, built-in calls run by the engine, client tool calls."""
