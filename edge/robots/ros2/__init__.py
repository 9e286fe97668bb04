"""A ROS 2 robot through rclpy.

``config.py`` the topics and message types; ``convert.py`` ROS messages <-> arrays;
``bridge.py`` where the ROS callbacks hand messages to the control thread;
``sync.py`` message_filters-style approximate-time synchronisation; ``robot.py`` the
Robot backend and the intervention Operator over a transport; ``node.py`` the only
module that imports rclpy (the transport on a real ROS 2 system). Everything but
``node.py`` runs and is tested without ROS, with ``rosbags`` message types.
"""
